"""Helpers shared by the test modules: each module here owns one kind of test fixture."""
