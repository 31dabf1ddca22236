from kifmerge.cli import main

main()
