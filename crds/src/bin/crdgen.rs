//! Writes berth's CRD YAML into `charts/berth/crds/` (or the directory given as argument).
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/berth/crds"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, yaml) in berth_crds::crd_files() {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
