from vae_cli.commands.main import main

raise SystemExit(main())
