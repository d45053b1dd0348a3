"""The product catalog (DESIGN §7): which price or product key grants which features."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec


class Product(msgspec.Struct, frozen=True, kw_only=True):
    key: str = ""
    price_id: str
    mode: str
    features: tuple[str, ...] = ()
    access_days: int | None = None
    amount: int | None = None
    currency: str | None = None


class Catalog(msgspec.Struct, frozen=True):
    currency: str = "inr"
    products: dict[str, Product] = {}

    def by_key(self, key: str | None) -> Product | None:
        return self.products.get(key) if key else None

    def by_price(self, price_id: str | None) -> Product | None:
        if not price_id:
            return None
        for product in self.products.values():
            if product.price_id == price_id:
                return product
        return None


class CatalogError(ValueError):
    pass


def parse_catalog(text: str) -> Catalog:
    try:
        raw = tomllib.loads(text)
        catalog = msgspec.convert(raw, Catalog)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise CatalogError(f"catalog: {exc}") from None
    products = {}
    for key, product in catalog.products.items():
        if product.mode not in {"payment", "subscription"}:
            raise CatalogError(f"catalog: products.{key}.mode must be payment or subscription")
        if product.access_days is not None and product.mode != "payment":
            raise CatalogError(f"catalog: products.{key}.access_days is for one-time purchases only")
        products[key] = msgspec.structs.replace(product, key=key)
    return Catalog(currency=catalog.currency.lower(), products=products)


def load_catalog(path: str | Path) -> Catalog:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CatalogError(f"catalog: cannot read {path}: {exc.strerror}") from None
    return parse_catalog(text)
