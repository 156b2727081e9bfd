from vllm_moe_offload.cli import main

main()
