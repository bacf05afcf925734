"""``python -m paser.cli`` (what ``accelerate launch -m paser.cli recover ...`` runs)."""

from paser.cli import main

main()
