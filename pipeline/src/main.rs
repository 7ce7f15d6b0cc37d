use clap::Parser;
use safepipe::cli::{self, Cli};
use safepipe::error::exit;

/// mimalloc: tokenizing allocates per token, and glibc malloc spent a third of the tokenize
/// stage's time in its locks and free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let code = match cli::init_logging(cli.log_format, &cli.log) {
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
        Ok(()) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
            match runtime.block_on(cli::run(cli)) {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("error: {e}");
                    e.exit_code()
                }
            }
        }
    };
    std::process::exit(code);
}
