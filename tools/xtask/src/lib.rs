//! Project automation behind `cargo xtask`.
//!
//! Owns the architecture check (the dependency rules written in `ARCHITECTURE.md`, enforced on
//! the resolved dependency graph) and the lockfile's crypto-stack rules. It reads files and runs
//! `cargo`; it never builds or runs the product itself. It also writes the Yocto layer's crate
//! list from the lockfile ([`yocto`]), and knows what its set-up steps must leave behind on the
//! host ([`host`]).

pub mod arch;
pub mod crypto;
pub mod host;
pub mod yocto;
