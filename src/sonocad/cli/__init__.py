"""The command line: argument parsing (`main`) over one function per verb (`commands`)."""
