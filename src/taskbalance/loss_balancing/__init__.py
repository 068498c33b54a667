"""Loss-level balancing methods: each turns the K raw losses into balanced losses ℓ̃ and task weights."""
