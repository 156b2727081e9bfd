from vllm_moe_offload.cli import main

if __name__ == "__main__":  # not on import: spawned processes may import the main module
    main()
