from echo4o.cli import main

main()
