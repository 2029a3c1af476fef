"""The `moecli` command line: parse options, call the engine, print. `app.main` is the entry point."""
