//! Helpers shared by the engine's integration tests.

use std::time::Duration;

/// How many nodes of operator `name` a [`diffusionx_engine::Graph::profile`] report ran.
pub(crate) fn op_count(report: &[(String, Duration, usize)], name: &str) -> usize {
    report
        .iter()
        .filter(|(op, _, _)| op == name)
        .map(|(_, _, n)| n)
        .sum()
}
