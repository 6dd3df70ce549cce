//! The `nextquill` command-line tool: a thin facade over the library.

fn main() {}
