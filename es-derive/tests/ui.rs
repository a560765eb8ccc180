//! Compile-fail fixtures: misuse of the macros is an error that says what to write.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/projector/*.rs");
    t.compile_fail("tests/ui/read_model/*.rs");
}
