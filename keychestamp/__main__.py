"""
python -m keychestamp
"""

from keychestamp.script import main

main()
