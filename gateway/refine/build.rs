//! With the `cuda` feature, compiles `kernels/fused.cu` to PTX with the CUDA toolkit's `nvcc`
//! (the toolkit candle's own kernels need too) for `src/cuda.rs` to load. `CUDA_COMPUTE_CAP`
//! (as for candle) picks the virtual architecture, default 70; the driver compiles the PTX for
//! the GPU it runs on. Without the feature nothing is built.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "70".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let ptx = out.join("fused.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("kernels/fused.cu")
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{} failed on kernels/fused.cu: {status}", nvcc.display()),
        Err(err) => panic!(
            "the cuda feature needs the CUDA toolkit's nvcc ({}): {err}",
            nvcc.display()
        ),
    }
}
