"""The ``diskforge`` command: one module per subcommand group, each thin over ``ops``."""
