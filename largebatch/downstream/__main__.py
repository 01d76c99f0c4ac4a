"""`python -m largebatch.downstream ...` = `lb-finetune ...` (works before the console script is
installed)."""

from largebatch.downstream.cli import main

main()
