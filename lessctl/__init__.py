"""lessctl: LESS data selection (Xia et al., ICML 2024) as one command-line tool."""

__version__ = "0.1.0"
