//! Integration tests against the real ClickHouse (see jobs/tests for the whole job).
