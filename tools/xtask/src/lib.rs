//! Project automation behind `cargo xtask`.
//!
//! Owns the architecture check (the dependency rules written in `ARCHITECTURE.md`, enforced on
//! the resolved dependency graph) and the lockfile's crypto-stack rules. It reads files and runs
//! `cargo`; it never builds or runs the product itself.

pub mod arch;
pub mod crypto;
