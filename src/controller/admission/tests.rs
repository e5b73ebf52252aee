//! Tests of the loop's write path.
