"""The `hybrid` command: argument parsing (`main`), one module per subcommand (run, chat,
serve, rules, bench) and the shared defaults (built-in model, sampling options). The top
layer: may import every other."""
