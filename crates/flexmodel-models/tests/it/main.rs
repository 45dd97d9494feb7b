//! Integration tests of flexmodel-models against the Hugging Face reference fixtures.
// Test helpers fail by panicking, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod attention;
mod dtype;
mod errors;
mod generate;
mod hooks;
mod moe;
mod padding;
mod reference;
