from medsynth.cli import main

# The guard matters: worker processes (forkserver) re-import the main module.
if __name__ == "__main__":
    main()
