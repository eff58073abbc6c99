//! `query`: the videocount read API and UI (see lib.rs and README.md).

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = videocount_query_service::QueryArgs::parse();
    videocount_http::main("query", videocount_query_service::run(args))
}
