//! `bench-edge --kernels`: the kernels crate's f32 product on weights packed at load against its
//! int8 product (7-bit weights, activations quantized per call) on the matrix shapes of the
//! full-size Tiny-SD UNet, on the same data in the same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use diffusionx_kernels::{
    Matrix, MatrixMut, Operand, Packed, Quantized, Side, matmul_packed, matmul_quantized,
};

use crate::machine::machine;

/// `(m, k, n, the weight's side, what it is)`.
const SHAPES: [(usize, usize, usize, Side, &str); 9] = [
    (1024, 320, 320, Side::Right, "attention projection at 32x32"),
    (
        1024,
        320,
        2560,
        Side::Right,
        "feed-forward in (GEGLU) at 32x32",
    ),
    (1024, 1280, 320, Side::Right, "feed-forward out at 32x32"),
    (256, 640, 5120, Side::Right, "feed-forward in at 16x16"),
    (64, 1280, 10240, Side::Right, "feed-forward in at 8x8"),
    (320, 320, 1024, Side::Left, "1x1 convolution at 32x32"),
    (
        320,
        2880,
        1024,
        Side::Left,
        "3x3 convolution's columns at 32x32",
    ),
    (
        640,
        5760,
        256,
        Side::Left,
        "3x3 convolution's columns at 16x16",
    ),
    (
        1280,
        11520,
        64,
        Side::Left,
        "3x3 convolution's columns at 8x8",
    ),
];

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 211.0)
        .collect()
}

fn output(data: &mut [f32], rows: usize, columns: usize) -> MatrixMut<'_> {
    MatrixMut {
        data,
        rows,
        columns,
        row_stride: columns,
        column_stride: 1,
    }
}

fn view(data: &[f32], rows: usize, columns: usize) -> Matrix<'_> {
    Matrix {
        data,
        rows,
        columns,
        row_stride: columns,
        column_stride: 1,
    }
}

/// Times both products on every shape (the fastest of `repeat` alternating calls each, at least
/// 3) and appends a table to `out`.
pub(crate) fn run(threads: usize, repeat: usize, out: &Path) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")?;
    let mut text = format!(
        "\n## Kernels: f32 products on packed weights vs int8 products, {threads} thread(s)\n\n- machine: {}\n- command: `cargo run --release -p diffusionx-bench --bin bench-edge -- --kernels --threads {threads} --repeat {repeat}`\n- times: the fastest of {} alternating calls of each, milliseconds; GOP/s counts a multiply-add as two\n\n| m x k x n | weight | what | f32 ms | f32 GFLOP/s | int8 ms | int8 GOP/s | f32 / int8 |\n|---|---|---|---|---|---|---|---|\n",
        machine(),
        repeat.max(3),
    );
    for (m, k, n, side, what) in SHAPES {
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let (weight, x) = match side {
            Side::Left => (view(&a, m, k), view(&b, k, n)),
            Side::Right => (view(&b, k, n), view(&a, m, k)),
        };
        let packed = Packed::new(weight, side)?;
        let quantized = Quantized::new(weight, side)?;
        let mut c = vec![0f32; m * n];
        let (mut f32_s, mut int8_s) = (f64::MAX, f64::MAX);
        for _ in 0..repeat.max(3) {
            let out = output(&mut c, m, n);
            let (l, r) = match side {
                Side::Left => (Operand::Packed(&packed), Operand::View(x)),
                Side::Right => (Operand::View(x), Operand::Packed(&packed)),
            };
            let start = Instant::now();
            matmul_packed(l, r, out, false, threads)?;
            f32_s = f32_s.min(start.elapsed().as_secs_f64());
            let out = output(&mut c, m, n);
            let start = Instant::now();
            matmul_quantized(x, &quantized, out, false, threads)?;
            int8_s = int8_s.min(start.elapsed().as_secs_f64());
        }
        let rate = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        let row = format!(
            "| {m} x {k} x {n} | {} | {what} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |\n",
            if side == Side::Left { "left" } else { "right" },
            f32_s * 1e3,
            rate(f32_s),
            int8_s * 1e3,
            rate(int8_s),
            f32_s / int8_s,
        );
        eprint!("{row}");
        text.push_str(&row);
    }
    let mut existing = std::fs::read_to_string(out).unwrap_or_default();
    existing.push_str(&text);
    std::fs::write(out, existing).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("appended {} rows to {}", SHAPES.len(), out.display());
    Ok(())
}
