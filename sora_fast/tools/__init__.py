"""Developer tools: offline kernel reports (resources, instruction mix, gates) for the shipped kernels."""
