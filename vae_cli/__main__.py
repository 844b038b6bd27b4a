from vae_cli.cli import main

raise SystemExit(main())
