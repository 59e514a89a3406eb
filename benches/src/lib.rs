//! criterion benchmarks of overlay's hot paths live in `benches/benches/`; the end-to-end comparison script is `benches/e2e-compare.sh`.
