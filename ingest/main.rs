//! `ingest`: the videocount write API (see lib.rs and README.md).

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = videocount_ingest::IngestArgs::parse();
    videocount_http::main("ingest", videocount_ingest::run(args))
}
