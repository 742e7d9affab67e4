"""A toy model family that lives in the tests alone, to prove that adding a family is
a model file, a task file, a pipeline file and one registration: no edit in src/."""
