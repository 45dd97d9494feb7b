//! Integration tests of the hook runtime on a toy model whose gradients are derived by hand.

// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backward;
mod groups;
mod toy;
