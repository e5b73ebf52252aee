use sovereign_operator::cli::{self, Command};

// Why mimalloc: see its entry in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One runtime thread: the operator waits on the API server far more than it
// computes (view builds run on the blocking pool), and a multi-thread
// runtime's wake-ups across threads took about a quarter of its CPU (perf,
// national bench).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = cli::parse(std::env::args_os());
    let operator = matches!(cli.command, Command::Run(_));
    let result = match cli.command {
        Command::Run(args) => {
            sovereign_operator::telemetry::init_logging(cli.log_format)?;
            sovereign_operator::controller::run(args).await
        }
        Command::Crd(args) => sovereign_operator::crdgen::run(&args),
        Command::Report(args) => sovereign_operator::report::run(&args).await,
        Command::Plan(args) => sovereign_operator::plan::run(&args).await,
        Command::Completion(args) => {
            cli::completion(args.shell, &cli::invoked_name(std::env::args_os()), &mut std::io::stdout());
            Ok(())
        }
        Command::Docs(args) => sovereign_operator::reference::write(&args.out_dir),
        Command::Version => {
            println!("{}", sovereign_operator::version::line());
            Ok(())
        }
    };
    if let Err(e) = result {
        // The operator's log keeps the whole chain (and a backtrace when asked);
        // a command prints one line and the hint.
        if operator {
            eprintln!("Error: {e:?}")
        } else {
            eprintln!("Error: {e:#}")
        }
        if let Some(hint) = sovereign_operator::kubeclient::hint(&e) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
    Ok(())
}
