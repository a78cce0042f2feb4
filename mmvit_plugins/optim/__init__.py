from .layer_decay_constructor import LayerDecayOptimWrapperConstructor, get_vit_layer_id

__all__ = ['LayerDecayOptimWrapperConstructor', 'get_vit_layer_id']
