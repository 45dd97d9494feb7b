//! Integration tests of flexmodel-models against the Hugging Face reference fixtures.

mod common;
mod dtype;
mod errors;
mod padding;
mod reference;
