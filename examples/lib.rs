//! Runnable examples of Weft: see the `[[example]]` entries of this crate.
