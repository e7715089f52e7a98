//! Cross-component benchmarks of Weft live here (`cargo bench -p weft-benches`).
//! Component benchmarks sit with their crate: the node agent's in
//! `node-agent/benches/agent.rs` (`cargo bench -p weft-node-agent`), since it
//! drives the agent's own binary.
