"""Program layer: the `staticegress` command and its subcommands."""
