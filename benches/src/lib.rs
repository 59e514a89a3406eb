//! criterion benchmarks of the hot paths; see benches/*.rs.
