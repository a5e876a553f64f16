"""Injection: the rules engine (`placement`: YAML rule files matched against the module
tree), the plan it prints, the loader (build the family's module tree, apply the rules, load
the weights) and the loaded `Model`, with its expected memory. May import the engine,
operators, models and files layers; never the server or the CLI."""
