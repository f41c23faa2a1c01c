"""`python -m proxy`: the same commands as the `guardrail-proxy` console script."""

from proxy.cli import main

raise SystemExit(main())
