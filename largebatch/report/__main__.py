"""`python -m largebatch.report ...` = `lb-report ...` (works before the console script is installed)."""

from largebatch.report.cli import main

raise SystemExit(main())
