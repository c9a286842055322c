"""Reports: every command's result rendered as JSON (a contract), as rich text for people, or as
a plot. Only this package and the CLI know about formats."""
