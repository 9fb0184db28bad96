//! `c = a b` (or `c += a b`) on strided views of plain slices, by the `gemm` crate.
//!
//! The kiosk's linear layers (tract's `EinSum` with a weight matrix) run through it: each
//! operand is a matrix view into the tensor as it lies (any row and column stride), so no
//! operand is copied or transposed before the product, and the output is written in place.
//! The one `unsafe` call comes after the checks that keep every index it touches inside its
//! slice.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// A `rows x columns` matrix in a slice: element `(i, j)` at `i * row_stride + j *
/// column_stride`.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub columns: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub column_stride: usize,
}

/// A `rows x columns` matrix written in a slice, laid out as [`Matrix`]'s.
#[derive(Debug)]
pub struct MatrixMut<'a> {
    /// The values.
    pub data: &'a mut [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub columns: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub column_stride: usize,
}

/// The operands of [`matmul`] do not fit each other or their slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatmulMismatch(pub &'static str);

impl std::fmt::Display for MatmulMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "matrix product: {}", self.0)
    }
}

impl std::error::Error for MatmulMismatch {}

/// The index one past the last element a view reaches (0 for an empty one).
fn reach(rows: usize, columns: usize, row_stride: usize, column_stride: usize) -> Option<usize> {
    if rows == 0 || columns == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(row_stride)?
        .checked_add((columns - 1).checked_mul(column_stride)?)?
        .checked_add(1)
}

/// Whether `x`'s elements all lie inside its slice.
pub(crate) fn check(x: &Matrix<'_>) -> Result<(), MatmulMismatch> {
    match reach(x.rows, x.columns, x.row_stride, x.column_stride) {
        Some(end) if end <= x.data.len() => Ok(()),
        _ => Err(MatmulMismatch("a view reaches past its slice")),
    }
}

/// Whether `c`'s elements are distinct: no zero stride unless that size is 1, and rows and
/// columns that do not land on each other.
pub(crate) fn check_distinct(c: &MatrixMut<'_>) -> Result<(), MatmulMismatch> {
    let (m, n) = (c.rows, c.columns);
    let distinct = |size: usize, stride: usize| size <= 1 || stride > 0;
    let overlap = m > 1 && n > 1 && {
        // Rows and columns of c must not land on each other: one stride must step over
        // the whole extent of the other.
        let row_span = (n - 1) * c.column_stride;
        let column_span = (m - 1) * c.row_stride;
        c.row_stride <= row_span && c.column_stride <= column_span
    };
    if !distinct(m, c.row_stride) || !distinct(n, c.column_stride) || overlap {
        return Err(MatmulMismatch("the output's elements overlap"));
    }
    Ok(())
}

/// `c` checked as the output of an `m x k` by `k x n` product (`m`, `n` its sizes): inside its
/// slice, its elements distinct. `None` when the product is done already: nothing to write, or
/// (an empty inner size) `c` zeroed unless `accumulate`.
pub(crate) fn output_to_write(
    c: MatrixMut<'_>,
    k: usize,
    accumulate: bool,
) -> Result<Option<MatrixMut<'_>>, MatmulMismatch> {
    let view = Matrix {
        data: c.data,
        rows: c.rows,
        columns: c.columns,
        row_stride: c.row_stride,
        column_stride: c.column_stride,
    };
    check(&view)?;
    check_distinct(&c)?;
    if c.rows == 0 || c.columns == 0 {
        return Ok(None);
    }
    if k == 0 {
        if !accumulate {
            fill_zero(c);
        }
        return Ok(None);
    }
    Ok(Some(c))
}

/// Zeroes every element of `c` (a product over an empty inner size), after [`check`].
pub(crate) fn fill_zero(c: MatrixMut<'_>) {
    for i in 0..c.rows {
        for j in 0..c.columns {
            c.data[i * c.row_stride + j * c.column_stride] = 0.0;
        }
    }
}

/// `c = a b`, or `c += a b` with `accumulate`, on `threads` threads of rayon's pool (1: this
/// thread only). `c`'s elements must be distinct (no zero stride unless that size is 1).
pub fn matmul(
    a: Matrix<'_>,
    b: Matrix<'_>,
    c: MatrixMut<'_>,
    accumulate: bool,
    threads: usize,
) -> Result<(), MatmulMismatch> {
    let (m, k, n) = (a.rows, a.columns, b.columns);
    if b.rows != k || c.rows != m || c.columns != n {
        return Err(MatmulMismatch("the operands' sizes do not fit"));
    }
    check(&a)?;
    check(&b)?;
    check(&Matrix {
        data: c.data,
        rows: c.rows,
        columns: c.columns,
        row_stride: c.row_stride,
        column_stride: c.column_stride,
    })?;
    check_distinct(&c)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            fill_zero(c);
        }
        return Ok(());
    }
    // Few rows: gemm's own threads split them too finely; each thread takes a share of the
    // columns instead, and packs only its share of `b`.
    let parts = match threads {
        t if t > 1 && m < SPLIT_ROWS && n >= t * MIN_SHARE => t,
        _ => 1,
    };
    let parallelism = match threads {
        t if t > 1 && parts == 1 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    let (dst, lhs, rhs) = (
        Shared(c.data.as_mut_ptr()),
        a.data.as_ptr(),
        Shared(b.data.as_ptr().cast_mut()),
    );
    let lhs = Shared(lhs.cast_mut());
    let share = |part: usize| {
        let (first, end) = (n * part / parts, n * (part + 1) / parts);
        // SAFETY: the checks above keep every index the product reads (a: i * rs + l * cs, b:
        // l * rs + j * cs) or writes (c: i * rs + j * cs), for i < m, l < k, j < n, inside its
        // slice; this share's columns `first..end` start `first` columns into b and c and stay
        // within n. c's elements are distinct, so the shares write disjoint elements, and c is
        // borrowed mutably for the whole call, so it aliases neither input and no one else
        // reads it meanwhile; it is read (`read_dst`) only with `accumulate`, when it holds the
        // caller's values.
        unsafe {
            gemm::gemm(
                m,
                end - first,
                k,
                dst.get().add(first * c.column_stride),
                c.column_stride as isize,
                c.row_stride as isize,
                accumulate,
                lhs.get(),
                a.column_stride as isize,
                a.row_stride as isize,
                rhs.get().add(first * b.column_stride),
                b.column_stride as isize,
                b.row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    match parts {
        1 => share(0),
        _ => (0..parts).into_par_iter().for_each(share),
    }
    Ok(())
}

/// Below this many rows, [`matmul`] gives each thread a share of the columns (measured on the
/// kiosk's linear layers: `docs/benchmarks.md`).
pub const SPLIT_ROWS: usize = 256;

/// The fewest columns a thread's share has.
pub(crate) const MIN_SHARE: usize = 64;

/// A pointer the threads of one [`matmul`] share; each writes its own columns through it.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Shared`, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the shares read the inputs and write disjoint elements of the output (see `matmul`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` values in -0.5..0.5, different for each `seed`.
    pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 211.0)
            .collect()
    }

    /// A `rows x columns` view of `data`, row-major or (`transposed`) column-major.
    pub(crate) fn view(data: &[f32], rows: usize, columns: usize, transposed: bool) -> Matrix<'_> {
        Matrix {
            data,
            rows,
            columns,
            row_stride: if transposed { 1 } else { columns },
            column_stride: if transposed { rows } else { 1 },
        }
    }

    /// The product by the definition, in f64.
    pub(crate) fn naive(a: &Matrix<'_>, b: &Matrix<'_>) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.columns];
        for i in 0..a.rows {
            for j in 0..b.columns {
                out[i * b.columns + j] = (0..a.columns)
                    .map(|l| {
                        f64::from(a.data[i * a.row_stride + l * a.column_stride])
                            * f64::from(b.data[l * b.row_stride + j * b.column_stride])
                    })
                    .sum();
            }
        }
        out
    }

    /// Runs `product` into an `m x n` output (column-major with `c_t`) that holds 0.5
    /// everywhere, and checks it against `expected` (plus 0.5 with `accumulate`).
    pub(crate) fn check_output(
        expected: &[f64],
        (m, n): (usize, usize),
        (c_t, accumulate): (bool, bool),
        tolerance: f64,
        label: &str,
        product: impl FnOnce(MatrixMut<'_>),
    ) {
        let (rs, cs) = if c_t { (1, m) } else { (n, 1) };
        let mut c_data = vec![0.5f32; m * n];
        product(MatrixMut {
            data: &mut c_data,
            rows: m,
            columns: n,
            row_stride: rs,
            column_stride: cs,
        });
        let base = if accumulate { 0.5 } else { 0.0 };
        for i in 0..m {
            for j in 0..n {
                let got = f64::from(c_data[i * rs + j * cs]);
                let want = expected[i * n + j] + base;
                assert!(
                    (got - want).abs() < tolerance,
                    "{label} ({i}, {j}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn products_of_strided_views_are_the_definitions() {
        // 23 columns: one product (on gemm's threads with 2); 150: a share of the columns per
        // thread with 2 (fewer rows than SPLIT_ROWS).
        const { assert!(37 < SPLIT_ROWS && 23 < 2 * MIN_SHARE && 150 >= 2 * MIN_SHARE) };
        for n in [23, 150] {
            products_of_strided_views_are_the_definitions_for(n);
        }
    }

    fn products_of_strided_views_are_the_definitions_for(n: usize) {
        let (m, k) = (37, 29);
        let a_data = values(m * k, 1);
        let b_data = values(k * n, 2);
        // Row-major and column-major (transposed) layouts of each operand and of the output.
        for a_t in [false, true] {
            for b_t in [false, true] {
                for c_t in [false, true] {
                    for threads in [1, 2] {
                        let a = Matrix {
                            data: &a_data,
                            rows: m,
                            columns: k,
                            row_stride: if a_t { 1 } else { k },
                            column_stride: if a_t { m } else { 1 },
                        };
                        let b = Matrix {
                            data: &b_data,
                            rows: k,
                            columns: n,
                            row_stride: if b_t { 1 } else { n },
                            column_stride: if b_t { k } else { 1 },
                        };
                        let expected = naive(&a, &b);
                        for accumulate in [false, true] {
                            let label = format!("{a_t} {b_t} {c_t} {threads}");
                            let run =
                                |c: MatrixMut<'_>| matmul(a, b, c, accumulate, threads).unwrap();
                            check_output(&expected, (m, n), (c_t, accumulate), 1e-5, &label, run);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn views_past_their_slices_and_mismatched_sizes_are_refused() {
        let data = values(12, 0);
        let mut out = vec![0f32; 12];
        let a = Matrix {
            data: &data,
            rows: 3,
            columns: 4,
            row_stride: 4,
            column_stride: 1,
        };
        let b = Matrix {
            data: &data,
            rows: 4,
            columns: 3,
            row_stride: 3,
            column_stride: 1,
        };
        fn c(out: &mut [f32], rows: usize, row_stride: usize) -> MatrixMut<'_> {
            MatrixMut {
                data: out,
                rows,
                columns: 3,
                row_stride,
                column_stride: 1,
            }
        }
        assert_eq!(matmul(a, b, c(&mut out, 3, 3), false, 1), Ok(()));
        let long = Matrix { rows: 4, ..a };
        assert_eq!(
            matmul(long, b, c(&mut out, 4, 3), false, 1),
            Err(MatmulMismatch("a view reaches past its slice"))
        );
        assert_eq!(
            matmul(a, a, c(&mut out, 3, 3), false, 1),
            Err(MatmulMismatch("the operands' sizes do not fit"))
        );
        assert_eq!(
            matmul(a, b, c(&mut out, 3, 1), false, 1),
            Err(MatmulMismatch("the output's elements overlap"))
        );
        assert_eq!(
            matmul(a, b, c(&mut out, 3, 0), false, 1),
            Err(MatmulMismatch("the output's elements overlap"))
        );
    }
}
