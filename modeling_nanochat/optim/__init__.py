"""MuonAdamW, its Trainer mixin, DeepSpeed routing, the depth dial's plan and the schedules."""
