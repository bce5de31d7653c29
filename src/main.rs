//! `cruddur-stream-worker`: see `cruddur_stream_worker::cli` for the commands.

fn main() -> std::process::ExitCode {
    cruddur_stream_worker::cli::main()
}
