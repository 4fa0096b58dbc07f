"""The process: glibc allocator settings (`allocator`), what the command line prints (`console`), the
torchrun process group (`dist`)."""
