//! `weft-shim`: the process between a node agent and each of its
//! containers (see `weft_node_agent::shim`). A program of its own, much
//! smaller than the agent, so that starting one per container costs little;
//! the agent uses it when it sits beside the agent's program, and runs
//! itself as the shim otherwise.

fn main() {
    std::process::exit(weft_node_agent::shim::run());
}
