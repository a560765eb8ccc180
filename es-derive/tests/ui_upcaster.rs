//! Misuse of `#[upcaster]` is a compile error that says what to write.

#[test]
fn upcaster_misuse() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/upcaster/*.rs");
}
