//! UniFFI's binding generator, pinned to the uniffi version the library is
//! built with, so the generated Python, Kotlin and Swift match its scaffolding.
//!
//! A crate of its own rather than a binary of `nextquill`: enabling uniffi's
//! `cli` feature inside the main crate changes the features of shared
//! dependencies, and cargo then builds llama.cpp a second time (about 9
//! CPU-minutes). Run it through `scripts/bindings.sh`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
