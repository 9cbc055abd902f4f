from squeeze_client.cli import main

main()
